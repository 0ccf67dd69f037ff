"""Stand-in for Transformers' `tests/exporters/test_export.py`, which the sdist does not ship.

`ModelTesterMixin` derives from `ExportTesterMixin`; the torch.export tests it would add are not run here.
"""


class ExportTesterMixin:
    pass
