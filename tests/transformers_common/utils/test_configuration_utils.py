"""Stand-in for Transformers' `tests/utils/test_configuration_utils.py`, which the sdist does not ship.

`ConfigTester.check_config_arguments_init` builds a config from `config_common_kwargs` and checks every field
kept its value: each entry is a field `PreTrainedConfig` declares in 5.24, set to a non-default value.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["HFClipTestArchitecture"],
    "id2label": {0: "label_0", 1: "label_1", 2: "label_2"},
    "label2id": {"label_0": 0, "label_1": 1, "label_2": 2},
    "problem_type": "multi_label_classification",
    "bos_token_id": 3,
    "eos_token_id": 4,
    "pad_token_id": 5,
}
