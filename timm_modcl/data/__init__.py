"""Datasets for training and evaluating tasks: image folders (built with timm's data pipeline) and the bundled
scikit-learn digits, split into a sequence of tasks for the demo.

    train_ds, val_ds, class_names = image_folder_datasets('flowers/', model, input_size=160)
    tasks = digits_tasks(num_tasks=5, size=32)   # [(name, class_names, train, test), ...]
"""

from .batches import check_labels, unpack_batch
from .folders import (
    FolderDatasets, ImageFiles, data_config, eval_transform, image_files, image_folder_datasets, read_rgb_image,
    scan_image_folder,
)
from .digits import DigitsTask, digits_tasks

__all__ = [
    'DigitsTask', 'FolderDatasets', 'ImageFiles', 'image_folder_datasets', 'data_config', 'eval_transform',
    'scan_image_folder', 'digits_tasks', 'image_files', 'read_rgb_image',
]
