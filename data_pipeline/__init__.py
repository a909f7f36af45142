"""Everything between image files and a device batch: shard writing, streaming, augmentation."""
