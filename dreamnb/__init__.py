"""dreamnb: teach Stable Diffusion about yourself, your dog or a style, from a notebook (DreamBooth)."""
import os

# The same seed must give the same model, and a resumed run the straight run's weights. On CPUs with AVX-512
# (Intel Xeons), MKL's threaded matrix products are not run-to-run reproducible by default: two identical
# 6-step CPU trainings differed in 420 of 440 UNet tensors (up to 8e-6) on the GPU machine's Xeon, and not
# at all with MKL's conditional numerical reproducibility on. MKL reads this once, at its first call, so it is
# set on import, before any training; a value the user set wins. GPUs (cuBLAS) are not affected.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
