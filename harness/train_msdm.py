"""Registry entry of `harness.generate.FAMILIES["msdm-unet"]` ("harness.train_msdm:load_generator"). The MSDM code
lives in the `harness.msdm` package; once the registry names "harness.msdm.sampling:load_generator" this file goes."""

from harness.msdm.sampling import load_generator

__all__ = ["load_generator"]
