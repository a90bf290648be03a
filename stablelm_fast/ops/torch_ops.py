"""The `torch` backend: the plain-torch references of ops/reference.py serve every op (registry.OpTable binds them);
linear layers run torch's own GEMM (F.linear). Nothing to define here: a backend module defines only the ops it
implements itself."""
