"""The Safe Trigger method (arXiv 2606.16808) as plain Python: tags, reasoning split, prompts, records, reward.

No Ray, no torch: services, pipelines and clients depend on this package, never on each other's insides.
"""

from .prompts import (
    CONTENT_FREE_INPUTS,
    answer_judge_messages,
    REVIEW_PART_CUES,
    VERDICT_PARTS,
    VerdictOptions,
    part_opening,
    judge_messages,
    query_messages,
    review_messages,
    structured_review_text,
)
from .reasoning import Fallback, ReasoningRule, Split, SplitSource, join_reasoning, split_reasoning
from .records import (
    Judgement,
    Kind,
    Label,
    Query,
    SplitName,
    Trajectory,
    assign_split,
    from_row,
    query_id,
    stable_hash,
    to_row,
)
from .thinking import Convention, SafePosition, convention_of, detect_convention, past_reasoning, review_prefill, safe_position, verdict_prefill
from .dpo import (PairChoice, capped_general, choose_pair, general_category, score_sample, select_general_pair,
                  visible_answer)
from .outcome import Incomplete, incomplete
from .refusal import is_refusal
from .reward import Pair, RewardWeights, Scored, category, reward, select_pair
from .tags import SAFE_CLOSE, SAFE_OPEN, SafeBlock, final_answer, parse_safe, render_safe_block, strip_safe_blocks

__all__ = [
    "SAFE_OPEN",
    "SAFE_CLOSE",
    "SafeBlock",
    "parse_safe",
    "render_safe_block",
    "strip_safe_blocks",
    "final_answer",
    "Fallback",
    "ReasoningRule",
    "Split",
    "SplitSource",
    "split_reasoning",
    "join_reasoning",
    "CONTENT_FREE_INPUTS",
    "VerdictOptions",
    "judge_messages",
    "review_messages",
    "review_prefill",
    "REVIEW_PART_CUES",
    "VERDICT_PARTS",
    "part_opening",
    "structured_review_text",
    "query_messages",
    "Kind",
    "Label",
    "SplitName",
    "Query",
    "Trajectory",
    "Judgement",
    "assign_split",
    "query_id",
    "stable_hash",
    "from_row",
    "to_row",
    "is_refusal",
    "RewardWeights",
    "Scored",
    "Pair",
    "reward",
    "category",
    "select_pair",
    "PairChoice",
    "capped_general",
    "choose_pair",
    "general_category",
    "score_sample",
    "select_general_pair",
    "visible_answer",
    "answer_judge_messages",
    "Incomplete",
    "incomplete",
    "Convention",
    "convention_of",
    "detect_convention",
    "past_reasoning",
    "SafePosition",
    "safe_position",
    "verdict_prefill",
]
