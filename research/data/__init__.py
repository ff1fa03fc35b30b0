"""Data sources and the training input pipeline."""

from research.data.pipeline import (
    IMAGE_FIELDS,
    from_model_range,
    make_eval_arrays,
    make_train_iterator,
    peek_shape,
    read_examples,
    to_model_range,
)
from research.data.sources import (
    DATA_DIR_ENV,
    SOURCE_NAMES,
    Cifar10Source,
    DataError,
    DigitsSource,
    IDXSource,
    ImageFolderSource,
    SyntheticSource,
    TfdsSource,
    get_source,
    read_fields,
)

__all__ = [
    "DATA_DIR_ENV",
    "SOURCE_NAMES",
    "Cifar10Source",
    "DataError",
    "DigitsSource",
    "IDXSource",
    "IMAGE_FIELDS",
    "ImageFolderSource",
    "SyntheticSource",
    "TfdsSource",
    "from_model_range",
    "get_source",
    "make_eval_arrays",
    "make_train_iterator",
    "peek_shape",
    "read_examples",
    "read_fields",
    "to_model_range",
]
