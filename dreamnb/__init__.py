"""dreamnb: teach Stable Diffusion about yourself, your dog or a style, from a notebook (DreamBooth)."""
__version__ = "0.1.0"
