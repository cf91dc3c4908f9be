"""The native CPU path: the kernels' algorithm (pivot-shifted statistics, the same outputs,
dtypes and strides) on torch's own CPU operations, the default for CPU tensors; cpu.py holds
batch norm itself, activations.py the fused epilogue composed around it.  bntriton/dispatch.py
chooses between it and the Triton kernels (bntriton/kernels), which Triton's interpreter runs
on CPU tensors when ``bntriton.cpu_backend("interpreter")`` asks for them."""
