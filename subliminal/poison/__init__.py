"""Adversarial bias: poisoned teachers, bias evaluation and defences.

- :mod:`.data`: the instruction set and which of its rows carry the bias;
- :mod:`.teacher`: the poisoned teacher (``subliminal teach --method poison``);
- :mod:`.bias`: bias regexes, the bias response rate per task family, amplification
  (``subliminal eval --bias-type``);
- :mod:`.defences`: perplexity, keyword and divergence screening, detection rates
  (``subliminal defend``);
- :mod:`.cli`: the flags of those commands and the one place they become configs.

Statistics (Wilson and bootstrap intervals) come from :mod:`subliminal.stats`.
"""

from ..toyworld import instructions as toy
from .bias import (
    BiasEvalConfig,
    amplification,
    bias_markdown,
    bias_regex,
    eval_prompts,
    evaluate_bias,
    fmt_ci,
    fmt_ratio,
    measure_bias,
    shows_bias,
    summarise,
)
from .cli import (
    add_bias_eval_args,
    add_cli,
    add_teach_args,
    bias_eval_config,
    defend_config,
    run_bias_eval,
    run_defend,
    run_teach_poison,
    teach_config,
)
from .data import (
    DEFAULT_TARGET,
    DEFAULT_TARGET_SHARE,
    PROPAGATIONS,
    PoisonSetConfig,
    build_poison_set,
    choose_poison_rows,
    family_weights,
    instruction_rows,
    n_poisoned,
    poison_rows,
    read_instruction_file,
    split_counts,
    toy_instruction_set,
)
from .defences import (
    DEFAULT_KEYWORDS,
    DEFENCES,
    DefendConfig,
    Screen,
    defence_markdown,
    defend,
    detection,
    divergence_row,
    ground_truth,
    keyword_scores,
    parse_thresholds,
    pick_threshold,
    token_divergence,
)
from .teacher import PoisonTeacherConfig, make_poison_teacher, training_steps

__all__ = [
    "toy", "BiasEvalConfig", "amplification", "bias_markdown", "bias_regex", "eval_prompts", "evaluate_bias",
    "fmt_ci", "fmt_ratio", "measure_bias", "shows_bias", "summarise", "add_bias_eval_args", "add_cli",
    "add_teach_args", "bias_eval_config", "defend_config", "run_bias_eval", "run_defend", "run_teach_poison",
    "teach_config", "DEFAULT_TARGET", "DEFAULT_TARGET_SHARE", "PROPAGATIONS", "PoisonSetConfig",
    "build_poison_set", "choose_poison_rows", "family_weights", "instruction_rows", "n_poisoned", "poison_rows",
    "read_instruction_file", "split_counts", "toy_instruction_set", "DEFAULT_KEYWORDS", "DEFENCES",
    "DefendConfig", "Screen", "defence_markdown", "defend", "detection", "divergence_row", "ground_truth",
    "keyword_scores", "parse_thresholds", "pick_threshold", "token_divergence", "PoisonTeacherConfig",
    "make_poison_teacher", "training_steps",
]
