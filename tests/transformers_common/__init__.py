"""Transformers' common test mixins (ModelTesterMixin, ConfigTester, ProcessorTesterMixin), run against hf_clip.

`make install` extracts `test_modeling_common.py`, `test_configuration_common.py` and `test_processing_common.py`
unmodified from the pinned transformers sdist on PyPI (`fetch.py` checks its sha256). The sdist ships only the
top-level files of Transformers' `tests/` folder, so the four helper modules those files import live here:
`exporters/test_export.py`, `generation/test_utils.py`, `utils/test_configuration_utils.py` and
`fetch_hub_objects_for_ci.py`. This file must stay free of imports: the configuration mixin executes it through
`direct_transformers_import`.
"""
