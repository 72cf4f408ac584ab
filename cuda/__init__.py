"""The CUDA sources of minillm's hand-written kernels, installed as the package `minillm.cuda`
(setup.cfg maps it to this top-level folder) so that `importlib.resources` finds them in a wheel."""
