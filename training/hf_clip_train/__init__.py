"""hf_clip's training scripts and their demo dataset: `python -m hf_clip_train.train` (Accelerate),
`hf_clip_train.evaluate`, `hf_clip_train.finetune_trainer` (Trainer). They need the `[train]` extra
(`pip install "hf-clip[train]"`). The repository keeps this package in `training/hf_clip_train/`."""
