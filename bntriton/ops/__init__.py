"""The batch-norm operators: registered with ``torch.library``, differentiable, traceable.

| module | what it holds |
|---|---|
| ``batch_norm.py`` | plain batch norm: the train / eval / backward / update ops, their autograd formulas, the eager calls |
| ``activated.py`` | batch norm with a fused activation and residual, and the in-place variant |
| ``registration.py`` | how an op is registered (a triton_op Inductor can see, an opaque fallback) |
| ``routes.py`` | which way a call goes: eager, torch.func, or traced |
| ``composite.py`` | the backward as torch ops, for double backward and torch.func |
| ``batching.py`` | vmap rules: vmapped problems folded into the channels |
| ``traceable.py`` | eval as standard operations, for export and tracing |

Both operator modules compute through bntriton/dispatch.py; the front end
(bntriton/functional.py) checks arguments before anything here runs.
"""
