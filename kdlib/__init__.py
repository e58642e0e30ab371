"""kdlib: helpers for the low-precision knowledge-distillation workbook."""
__version__ = "0.1.0"
