"""Triton INT8 W8A8 kernels for the Meituan block / channel formats (imported as hybrid_r1_kernels).

act_quant.py    per-token-group and per-token activation quantizers
int8_gemm.py    the W8A8 GEMMs: tiled (int8 A; PAIRED K tiles) and decode (A quantized in the kernel);
                block or channel scales, split-K, fused SiLU*up
int8_tiles.py   their @triton.jit building blocks (tile order, pointers, scaled dots, K loop, epilogue)
splitk.py       the store: epilogue, directly or through the one-launch split-K reduction
fused_moe.py    fused MoE: routing sort on the device, gate_up+SiLU and down over all experts, one
                launch each (INT8 block / channel, or BF16)
int8_linear.py  public wrappers: int8_{block,channel}_linear, int8_{block,channel}_gate_up
configs.py      tile configs (linears, fused MoE): tuned tables in configs/*.json, heuristic default
reference.py    the same math in plain torch (CPU fallback, test reference); no Triton import
"""
