"""How every script starts: its log format, and its place among the processes it was launched with."""

import logging

import torch
from accelerate import PartialState

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(main_process: bool = True) -> None:
    """INFO on the main process, WARNING on the others, in one format for every script."""
    logging.basicConfig(format=LOG_FORMAT, level=logging.INFO if main_process else logging.WARNING)


def process_state() -> PartialState:
    """This process's place among those `accelerate launch` / `torchrun` started (alone otherwise): on the
    accelerator when there is one, else on the CPU, where Accelerate only sets up multi-process gloo when told."""
    return PartialState(cpu=not torch.accelerator.is_available())
