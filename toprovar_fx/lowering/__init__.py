"""What happens to a graph after the passes: which code runs it.

* ``inductor_branches`` compiles the branches that the dispatcher calls (outlined residual
  branches) with Inductor, so pruned graphs run fused kernels, not one launch per FX node;
* ``cuda_graphs`` replays graphs with small inputs (the early, launch-bound scales) from
  CUDA graphs captured by us, so they cost a few host microseconds instead of one launch
  per kernel;
* ``runners`` holds the callables handed back to Dynamo: ``GraphRunner`` (runs one compiled
  graph, then records the entropy it returned) and ``ScaleSwitchRunner`` (prune mode: the
  dense, CUDA-graphable variant of a graph while the policy cannot act yet, the dispatcher
  variant from the first scale it may act on).
"""
