"""Datasets: formats -> canonical rows; sources (files, built-ins, hub); rows -> ids and labels."""

from martlet.data.preprocess import conversation_rows, encode_rows, train_val_rows
from martlet.data.sources import dataset_registry, load_dataset_rows, register_dataset, split_train_val

__all__ = ["conversation_rows", "encode_rows", "split_train_val", "train_val_rows", "dataset_registry",
           "load_dataset_rows", "register_dataset"]
