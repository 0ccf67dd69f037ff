"""hf_clip's training scripts and their demo dataset: `python -m training.train` (Accelerate), `training.evaluate`,
`training.finetune_trainer` (Trainer). They need the `[train]` extra (`pip install "hf-clip[train]"`). The wheel
installs this folder as the package `hf_clip_train`."""
