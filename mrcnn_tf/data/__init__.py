"""Input pipelines: ``build_dataset(config, training)`` -> ``(images, targets)`` batches."""

from mrcnn_tf.data.coco import CocoDataset
from mrcnn_tf.data.pipeline import SourceInfo, build_dataset, source_info
from mrcnn_tf.data.report import DataError

__all__ = ["CocoDataset", "DataError", "SourceInfo", "build_dataset", "source_info"]
