"""The trainer's one config: every knob, its default (the one that works) and why.

Built once at start-up by `feedloop.core.config` (flags > FEEDLOOP_* > TOML `[train]` > these
defaults) and passed down. The defaults learn all of the simulated preferences of the
benchmark (a word to include, a length, a word to avoid) with the default pretrained policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from feedloop.core.config import default_data_dir
from feedloop.core.registry.retention import RetentionPolicy
from feedloop.trainer.shaping import ShapingTerm, parse_shaping

Algorithm = Literal["actor-critic", "reinforce", "q-learning"]
Aggregation = Literal["mean", "earliest", "latest", "sum"]
UnratedRule = Literal["reward-model", "default", "leave-out"]
PublishAs = Literal["canary", "live", "shadow"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    # -- where -------------------------------------------------------------------------------
    data_dir: Path = field(
        default_factory=default_data_dir,
        metadata=_help("feedloop's data directory (default store, registry, work space)"),
    )
    store: str | None = field(
        default=None,
        metadata=_help(
            "replay store: SQLite path or postgresql:// URL "
            "(unset: DATA_DIR/replay.sqlite3, the server's default)"
        ),
    )
    registry: str | None = field(
        default=None,
        metadata=_help("model registry: directory or postgresql:// URL (unset: DATA_DIR/registry)"),
    )
    metrics_host: str = field(default="127.0.0.1", metadata=_help("address of /metrics"))
    metrics_port: int = field(
        default=9466, metadata=_help("port of the trainer's /metrics (0: any free port)")
    )
    algorithm: Algorithm = field(
        default="actor-critic",
        metadata=_help(
            "actor-critic: PPO-style clipped, off-policy, value critic, KL leash; "
            "reinforce: policy gradient with a learned baseline; q-learning: soft Q-learning "
            "(Guo et al. 2022, 'Efficient (Soft) Q-Learning for Text Generation with Limited "
            "Good Data') with Q = V + kl_coef * log(pi/ref) (Rafailov et al. 2024, 'From r to "
            "Q*'): soft Bellman backups on a Polyak target plus path consistency, no "
            "importance weights; its knobs are q_target_polyak, q_path_consistency_coef, "
            "gamma, and kl_coef as the soft-Q temperature beta"
        ),
    )
    reference_version: str | None = field(
        default=None,
        metadata=_help(
            "version the KL leash pulls towards (unset: the root of the live "
            "version's lineage, i.e. the pretrained policy)"
        ),
    )
    cursor_name: str = field(
        default="trainer", metadata=_help("name of the trainer's cursor in the store")
    )
    # -- when --------------------------------------------------------------------------------
    interval_s: float = field(
        default=60.0, metadata=_help("longest wait between rounds when feedback trickles in")
    )
    wake_after_feedback_events: int = field(
        default=256, metadata=_help("start a round as soon as this many new events are stored")
    )
    poll_interval_s: float = field(
        default=1.0, metadata=_help("how often the store is checked for new feedback")
    )
    pause_between_rounds_s: float = field(
        default=0.0, metadata=_help("idle time after each round, to leave CPU to a server")
    )
    torch_threads: int = field(
        default=1, metadata=_help("torch intra-op threads: 1 keeps a core free for the server")
    )
    nice: int = field(
        default=19,
        metadata=_help(
            "CPU priority increment of the trainer process (0-19, Unix nice): when server and "
            "trainer share cores the scheduler serves requests first (bench/bench_share.py "
            "measures serving latency while training); rounds take about as long"
        ),
    )
    seed: int = field(default=0, metadata=_help("seed of replay sampling and minibatch order"))
    log_level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata=_help("logging level of the round and decision lines (stdout)")
    )
    log_format: Literal["text", "json"] = field(
        default="text",
        metadata=_help(
            "text, or json: one object a line with round, version and outcome as fields"
        ),
    )
    nproc: int = field(
        default=1,
        metadata=_help(
            "processes that share each round's update (data parallel on torch.distributed, "
            "gloo): this one (rank 0: reads, gates, publishes) and nproc-1 spawned ranks, each "
            "taking a slice of every minibatch; gradients are all-reduced every step"
        ),
    )
    dist_timeout_s: float = field(
        default=300.0,
        metadata=_help(
            "a data-parallel rank silent this long in a collective fails the round (a rank "
            "that dies fails it at once); the next round starts the ranks afresh"
        ),
    )
    # -- the window --------------------------------------------------------------------------
    max_feedback_events: int = field(
        default=5000, metadata=_help("newest feedback events read per round (bounds round time)")
    )
    max_new_generations: int = field(
        default=5000, metadata=_help("newest logged generations read per round")
    )
    replay_sample_size: int = field(
        default=1024,
        metadata=_help(
            "older generations sampled back into each round (the replay buffer); "
            "keeps early lessons from being forgotten"
        ),
    )
    max_version_lag: int = field(
        default=8, metadata=_help("drop data generated more than this many versions before live")
    )
    max_data_age_s: float = field(
        default=7 * 24 * 3600.0, metadata=_help("drop data older than this (seconds)")
    )
    min_feedback_events: int = field(
        default=32, metadata=_help("fewer new events than this: skip the round and wait")
    )
    # -- rewards -----------------------------------------------------------------------------
    aggregation: Aggregation = field(
        default="mean", metadata=_help("how several ratings of one generation combine")
    )
    client_share_cap: float = field(
        default=0.5,
        metadata=_help(
            "most share of a round's feedback weight one client may carry "
            "(a guard against floods and poisoning)"
        ),
    )
    rating_class_balance: float = field(
        default=1.0,
        metadata=_help(
            "rebalancing of rating classes (liked, disliked, neutral) in each window: class c "
            "of K held by n_c of N ratings weighs (N / (K n_c)) ** this; 1: every class "
            "carries the same total weight, 0: off. Weights are reported per round. 1 learned "
            "faster on a 90/10 thumbs stream (0.51 and 0.47 against 0.21 and 0.26 after 1,500 "
            "events, two seeds) and on a natural one (0.61 against 0.53), docs/learning.md"
        ),
    )
    feedback_kind_balance: float = field(
        default=0.0,
        metadata=_help(
            "the same rebalancing across feedback kinds (rating, comparison, ranking, "
            "correction): 1 gives each kind in the window the same total weight, 0: off"
        ),
    )
    data_half_life_s: float = field(
        default=0.0,
        metadata=_help(
            "weigh each training generation by 0.5 ** (age / this), age counted back from the "
            "window's newest generation, so feedback from before a change of taste fades "
            "(discounted evidence, as in discounted UCB); 0: every generation weighs alike. "
            "Reported per round as data_age_weights"
        ),
    )
    # -- drift: a sharp drop of the served rating restarts learning (trainer/drift.py) ----------
    drift_detect: bool = field(
        default=True,
        metadata=_help(
            "before each round, look for a sharp drop of users' mean rating of what the policies "
            "serve (exploration left out) over the last drift_window_s; on one, record the "
            "change point, train from the best version under the evidence since it (drift_"
            "restart) and down-weight older data (drift_stale_weight). Reported per round as "
            "`drift` and in feedloop_trainer_drift_* metrics"
        ),
    )
    drift_window_s: float = field(
        default=120.0,
        metadata=_help(
            "how far back the detector looks, cut into drift_buckets buckets whose boundaries "
            "are the candidate change points (a change is found within about one bucket)"
        ),
    )
    drift_buckets: int = field(
        default=12, metadata=_help("buckets of drift_window_s (at least 2): the split points")
    )
    drift_min_drop: float = field(
        default=0.2,
        metadata=_help(
            "a drop counts when its lower confidence bound (mean rating on [-1, 1] before minus "
            "after the split) exceeds this: 0.2 is 0.1 of a liked rate, beyond the noise of "
            "learning one taste; 0.3 missed a fall of the served liked rate from 0.41 to 0.15 "
            "(bound 0.27, docs/learning.md)"
        ),
    )
    drift_alpha: float = field(
        default=0.05,
        metadata=_help(
            "1 - confidence of a detection, over both sides and every split (Bonferroni) and "
            "every look (confidence sequences)"
        ),
    )
    drift_min_ratings: int = field(
        default=100,
        metadata=_help(
            "rated generations each side of a split (and a version to be trained from after a "
            "change) needs before it is judged"
        ),
    )
    drift_restart: bool = field(
        default=True,
        metadata=_help(
            "after a detected change, until live is a version trained after it, train from the "
            "version with the best lower bound on its rating since the change, if above the "
            "reference's rating (or, without one, the collapsed level), else the reference: not "
            "from the collapsed live, which sits at the end of its KL leash"
        ),
    )
    drift_stale_weight: float = field(
        default=0.05,
        metadata=_help(
            "after a detected change, training data and feedback from before the change point "
            "weigh this (times any other weight), and the gate's held-out ratings leave them "
            "out: users no longer answer that way; 1: no down-weighting"
        ),
    )
    shaping: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "declared reward-shaping terms NAME:WEIGHT added to every training reward "
            "(length: words, keyword: 1 if every prompt keyword is in the phrase, finished: 1 "
            "if the phrase ended by itself), e.g. length:-0.05,keyword:0.3; reported per round"
        ),
    )
    join_window_s: float = field(
        default=30.0,
        metadata=_help("a generation unrated this long after it was served counts as unrated"),
    )
    unrated: UnratedRule = field(
        default="reward-model",
        metadata=_help(
            "reward of unrated generations: the reward model's score, a default "
            "value, or leave them out"
        ),
    )
    unrated_default_reward: float = field(
        default=0.0, metadata=_help("reward of an unrated generation under unrated=default")
    )
    heldout_share: float = field(
        default=0.1,
        metadata=_help(
            "share of generations (by id hash) kept out of training for the gate's "
            "off-policy estimates and of pairs for reward-model accuracy"
        ),
    )
    rm_steps: int = field(default=80, metadata=_help("reward-model optimiser steps per round"))
    rm_learning_rate: float = field(default=0.1, metadata=_help("reward-model Adam step size"))
    rm_l2: float = field(
        default=1e-3, metadata=_help("reward-model weight decay: word features are sparse")
    )
    rm_min_pairs: int = field(
        default=16, metadata=_help("fewer preference pairs than this: no reward model this round")
    )
    rm_min_accuracy: float = field(
        default=0.55,
        metadata=_help("held-out pairwise accuracy below this: the reward model scores nothing"),
    )
    # -- the update --------------------------------------------------------------------------
    lora_rank: int = field(
        default=0,
        metadata=_help(
            "0: the whole policy trains. R > 0 (hf-causal-lm policies): LoRA adapters of rank R "
            "over the live full version, frozen as their base; only the adapters and the value "
            "head train, and each publication is an adapter of a few MB naming its base by "
            "content digest (a live adapter keeps its own rank and targets)"
        ),
    )
    lora_alpha: int = field(
        default=16, metadata=_help("LoRA scale: the adapter's update is scaled by alpha / rank")
    )
    lora_targets: str = field(
        default="",
        metadata=_help(
            "comma-separated module names that carry an adapter (unset: the attention "
            "projections, q_proj,k_proj,v_proj,o_proj for Llama-style blocks, c_attn,c_proj "
            "for GPT-2)"
        ),
    )
    learning_rate: float = field(
        default=5e-4,
        metadata=_help(
            "Adam step size of the policy; with target_approx_kl it sets how far a round "
            "moves (1e-3 overshoots the gate's perplexity bound within two rounds)"
        ),
    )
    epochs: int = field(default=4, metadata=_help("passes over the round's data (PPO epochs)"))
    minibatch_size: int = field(
        default=128, metadata=_help("sequences per gradient step (~0.15 s each on one core)")
    )
    max_updates_per_round: int = field(
        default=96, metadata=_help("cap on gradient steps per round (bounds round time)")
    )
    target_approx_kl: float = field(
        default=0.02,
        metadata=_help(
            "stop a round's updates once the per-token KL(pi_old || pi) since the round began "
            "passes this (PPO early stopping): bounds how far one round moves the policy, so "
            "noisy windows cannot push it past the gate's perplexity bound"
        ),
    )
    gamma: float = field(default=1.0, metadata=_help("discount: phrases are short episodes"))
    q_target_polyak: float = field(
        default=0.05,
        metadata=_help(
            "q-learning: Polyak rate tau of the target network, target <- (1 - tau) target + "
            "tau policy after each step (Lillicrap et al. 2016); the target restarts from the "
            "live policy each round, so tau sets how far it trails within one round's steps"
        ),
    )
    q_path_consistency_coef: float = field(
        default=1.0,
        metadata=_help(
            "q-learning: weight of the multi-step path consistency beside the single-step "
            "soft Bellman loss (Guo et al. 2022 combine both: with the reward only at a "
            "phrase's end, single-step backups alone move it back one token per target update)"
        ),
    )
    gae_lambda: float = field(
        default=0.95, metadata=_help("GAE lambda: bias (0) vs variance (1) of advantages")
    )
    clip_eps: float = field(default=0.2, metadata=_help("PPO ratio clip"))
    value_clip: float = field(default=0.2, metadata=_help("value-loss clip around old values"))
    value_coef: float = field(default=0.5, metadata=_help("weight of the value loss"))
    entropy_coef: float = field(
        default=0.0,
        metadata=_help(
            "entropy bonus; 0 by default: learning one taste to its top with 0, 0.01 and 0.03 "
            "kept the candidates' sampled entropy (7.8 nats per phrase at the lowest) and "
            "distinct-phrase share (0.94) alike and near the pretrained policy's, and 0.03 "
            "was slower to half the gap (docs/learning.md)"
        ),
    )
    kl_coef: float = field(
        default=0.1,
        metadata=_help(
            "initial coefficient of the per-token KL penalty (adapted towards kl_target)"
        ),
    )
    kl_coef_max: float = field(
        default=1.0,
        metadata=_help(
            "the adaptive coefficient never grows past this: a KL held above target round "
            "after round (candidates refused, each round restarting from the same live "
            "policy) compounded it by 1.2 a round until every round's loss passed max_loss "
            "and the loop stopped learning (measured: 55 rounds in a row aborted)"
        ),
    )
    kl_target: float = field(
        default=3.0,
        metadata=_help(
            "target KL(policy || reference) per phrase in nats for the adaptive coefficient: "
            "the coefficient grows past it, slowing rounds before the gate's perplexity bound "
            "is reached (docs/learning.md)"
        ),
    )
    kl_horizon: float = field(
        default=2000.0, metadata=_help("horizon of the adaptive KL controller (sequences)")
    )
    adaptive_kl: bool = field(default=True, metadata=_help("adapt the KL coefficient to target"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient-norm clip"))
    importance_weight_max: float = field(
        default=1.0,
        metadata=_help(
            "truncation of behaviour importance weights pi_old/mu (V-trace's "
            "rho-bar): stale data can only count less, never explode"
        ),
    )
    correction_loss_weight: float = field(
        default=0.5, metadata=_help("weight of the teacher-forced loss on users' corrections")
    )
    max_loss: float = field(
        default=1e3, metadata=_help("a loss above this (or NaN) aborts the round")
    )
    # -- the gate ----------------------------------------------------------------------------
    corpus: Path | None = field(
        default=None,
        metadata=_help(
            "the corpus whose test split measures perplexity (unset: the shipped corpus)"
        ),
    )
    corpus_seed: int = field(default=0, metadata=_help("seed of the corpus split (pretraining's)"))
    gate_max_perplexity_ratio_live: float = field(
        default=1.15, metadata=_help("candidate / live held-out perplexity may not exceed this")
    )
    gate_max_perplexity_ratio_reference: float = field(
        default=1.3,
        metadata=_help("candidate / reference perplexity bound, so drift cannot accumulate"),
    )
    gate_max_kl: float = field(
        default=8.0,
        metadata=_help(
            "KL(candidate || reference) per phrase, nats, at most: catches drift on the "
            "policy's own samples that the corpus perplexity does not see; the perplexity "
            "bound is usually the one that binds first"
        ),
    )
    gate_kl_prompts: int = field(
        default=256, metadata=_help("held-out prompts sampled to measure the KL")
    )
    gate_diversity_prompts: int = field(
        default=64,
        metadata=_help(
            "held-out prompts (4 samples each) on which a candidate's diversity is measured"
        ),
    )
    gate_min_sampled_entropy_nats: float = field(
        default=1.0,
        metadata=_help(
            "a candidate whose own samples' entropy (mean -log p per phrase, nats) is below "
            "this is refused as collapsing; the default policy's is 7.95 to 8.17, so 1.0 "
            "catches only a policy close to one phrase per prompt (docs/learning.md)"
        ),
    )
    gate_min_distinct_share: float = field(
        default=0.25,
        metadata=_help(
            "a candidate whose share of distinct phrases among its own samples (4 per prompt) "
            "is below this is refused as collapsing; the default policy's is 0.93 to 0.97, and "
            "0.25 means the 4 samples of a prompt are all one phrase (docs/learning.md)"
        ),
    )
    gate_min_ope_samples: int = field(
        default=20, metadata=_help("fewer held-out rated generations: no off-policy check")
    )
    gate_ope_weight_max: float = field(
        default=20.0, metadata=_help("clip of sequence importance weights in the estimates")
    )
    gate_best_of_recent: int = field(
        default=3,
        metadata=_help(
            "earlier live versions (newest first) whose off-policy value a candidate must also "
            "reach, not only live's: against live alone a chain of candidates each a little "
            "worse than its parent passes every gate while reward drifts down; 0 compares with "
            "live only"
        ),
    )
    work_dir: Path | None = field(
        default=None, metadata=_help("scratch space for candidates (unset: DATA_DIR/trainer)")
    )
    # -- deployment and online decisions -----------------------------------------------------
    publish_as: PublishAs = field(
        default="canary",
        metadata=_help(
            "what a candidate that passed the gate becomes: a canary serving canary_share of "
            "traffic until users' ratings decide, a shadow (serves nothing), or live at once"
        ),
    )
    canary_share: float = field(
        default=0.1,
        metadata=_help(
            "share of requests a canary (or a shadow's scoring sample) takes: small enough "
            "that a bad candidate reaches few users, large enough to gather ratings"
        ),
    )
    decision_alpha: float = field(
        default=0.05,
        metadata=_help(
            "1 - confidence of every online verdict (time-uniform confidence sequences, so "
            "looking every decision_interval_s keeps it)"
        ),
    )
    decision_margin: float = field(
        default=0.1,
        metadata=_help(
            "promote a canary whose mean rating (on [-1, 1]) is confidently no more than this "
            "below live's: a candidate the users cannot tell from live still goes forward. "
            "The two sides' sequences together narrow to 0.1 at about 2,000 canary and "
            "18,000 live ratings; a smaller margin rarely promotes an equal candidate"
        ),
    )
    shadow_max_weight: float = field(
        default=2.0,
        metadata=_help(
            "a shadow trial's importance ratios are clipped here for its lower bound: "
            "smaller narrows the bound's noise, larger loosens less of a sharper candidate"
        ),
    )
    decision_min_ratings: int = field(
        default=30,
        metadata=_help("rated generations each side needs before a verdict (no early flukes)"),
    )
    max_trial_s: float = field(
        default=1800.0,
        metadata=_help(
            "a trial with no verdict after this long is rolled back (the trainer waits for "
            "it, so an undecidable candidate must not block training)"
        ),
    )
    watch_s: float = field(
        default=1800.0,
        metadata=_help(
            "after a promotion, roll the new live version back if in this time its ratings "
            "fall confidently below a recent version's"
        ),
    )
    decision_recent_versions: int = field(
        default=3,
        metadata=_help(
            "earlier live versions a freshly promoted one is compared with (the best-rated "
            "one on the rollback stack is added)"
        ),
    )
    decision_lookback_s: float = field(
        default=24 * 3600.0,
        metadata=_help("the recent versions' ratings are read over this much of the past"),
    )
    decision_interval_s: float = field(
        default=30.0,
        metadata=_help("how often the trainer judges the trial and the watched live version"),
    )
    # -- evidence that ages, and bringing an older version back (issue 21; core/discount.py) --
    evidence_half_life_s: float = field(
        default=300.0,
        metadata=_help(
            "the watch and bring_back weigh each rating by 0.5 ** (age / this), so evidence "
            "from before a change of taste fades (discounted UCB, Garivier & Moulines 2011); "
            "their confidence sequences use V = sum of the squared weights and stay valid at "
            "every look. 300: five minutes after a change, what users said before it weighs "
            "half. 0: off (every rating weighs 1). Trials stay undiscounted"
        ),
    )
    bring_back: bool = field(
        default=True,
        metadata=_help(
            "with no trial running, make an older version (the reference, or one on the "
            "rollback stack with its weights still in the registry) live again when its "
            "discounted ratings, exploration traffic included, are above live's with "
            "confidence 1 - decision_alpha (split over those versions)"
        ),
    )
    # -------------------------------------------------------------------------------------------
    require_human_eval: bool = field(
        default=False,
        metadata=_help(
            "promote a trial only after people judged it against live in blind evaluations "
            "(feedloop console): at least human_eval_min_verdicts verdicts, and the trial's "
            "win rate not clearly below human_eval_min_win_rate (else it is rolled back)"
        ),
    )
    human_eval_min_verdicts: int = field(
        default=20,
        metadata=_help("blind verdicts on trial against live needed before a promotion"),
    )
    human_eval_min_win_rate: float = field(
        default=0.5,
        metadata=_help(
            "roll the trial back when the upper end of its win rate's Wilson interval (at "
            "decision_alpha; ties and both-bad count half) is below this: 0.5 means raters "
            "clearly prefer live"
        ),
    )
    # -- registry retention ------------------------------------------------------------------
    registry_retention: bool = field(
        default=True,
        metadata=_help(
            "after each publish, delete the weights of registry versions nothing needs: live, "
            "the trial, pinned, rollback, reference, the newest and the best ones stay"
        ),
    )
    registry_keep_last: int = field(
        default=5, metadata=_help("newest published versions whose weights retention keeps")
    )
    registry_keep_best: int = field(
        default=3,
        metadata=_help("versions with the best off-policy value recorded by the gate, kept too"),
    )
    registry_keep_rollback: int = field(
        default=3,
        metadata=_help(
            "earlier live versions (the rollback stack, newest first) kept; never fewer than "
            "gate_best_of_recent, whose weights the gate loads"
        ),
    )

    def __post_init__(self) -> None:
        positive = (
            "learning_rate",
            "epochs",
            "minibatch_size",
            "rm_steps",
            "torch_threads",
            "kl_target",
            "kl_coef_max",
            "kl_horizon",
            "interval_s",
            "poll_interval_s",
            "importance_weight_max",
            "gate_ope_weight_max",
            "max_trial_s",
            "decision_interval_s",
            "shadow_max_weight",
            "nproc",
            "dist_timeout_s",
            "gate_diversity_prompts",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lora_rank < 0 or not self.lora_alpha > 0:
            raise ValueError(
                f"lora_rank must be >= 0 and lora_alpha > 0, got {self.lora_rank}, "
                f"{self.lora_alpha}"
            )
        if self.gate_best_of_recent < 0:
            raise ValueError(f"gate_best_of_recent must be >= 0, got {self.gate_best_of_recent}")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be in 0..19, got {self.nice}")
        if not 0 < self.client_share_cap <= 1:
            raise ValueError(f"client_share_cap must be in (0, 1], got {self.client_share_cap}")
        if not 0 <= self.canary_share <= 1:
            raise ValueError(f"canary_share must be in [0, 1], got {self.canary_share}")
        if not 0 < self.decision_alpha < 1:
            raise ValueError(f"decision_alpha must be in (0, 1), got {self.decision_alpha}")
        if not 0 <= self.q_target_polyak <= 1:
            raise ValueError(f"q_target_polyak must be in [0, 1], got {self.q_target_polyak}")
        if self.q_path_consistency_coef < 0:
            raise ValueError(
                f"q_path_consistency_coef must be >= 0, got {self.q_path_consistency_coef}"
            )
        if self.human_eval_min_verdicts < 1:
            raise ValueError(
                f"human_eval_min_verdicts must be >= 1, got {self.human_eval_min_verdicts}"
            )
        if not 0 <= self.human_eval_min_win_rate <= 1:
            raise ValueError(
                f"human_eval_min_win_rate must be in [0, 1], got {self.human_eval_min_win_rate}"
            )
        if self.require_human_eval and self.publish_as == "live":
            raise ValueError(
                "require_human_eval needs publish_as canary or shadow: a version published "
                "live at once goes live before anyone could evaluate it"
            )
        if not 0 <= self.heldout_share < 1:
            raise ValueError(f"heldout_share must be in [0, 1), got {self.heldout_share}")
        if not self.evidence_half_life_s >= 0:  # issue 21's evidence that ages
            raise ValueError(f"evidence_half_life_s must be >= 0, got {self.evidence_half_life_s}")
        if not self.data_half_life_s >= 0:
            raise ValueError(f"data_half_life_s must be >= 0, got {self.data_half_life_s}")
        if not self.drift_window_s > 0 or self.drift_buckets < 2:
            raise ValueError(
                "drift_window_s must be > 0 and drift_buckets >= 2, got "
                f"{self.drift_window_s} and {self.drift_buckets}"
            )
        if not 0 < self.drift_alpha < 1:
            raise ValueError(f"drift_alpha must be in (0, 1), got {self.drift_alpha}")
        if not 0 <= self.drift_min_drop <= 2:
            raise ValueError(f"drift_min_drop must be in [0, 2], got {self.drift_min_drop}")
        if self.drift_min_ratings < 1:
            raise ValueError(f"drift_min_ratings must be >= 1, got {self.drift_min_ratings}")
        if not 0 <= self.drift_stale_weight <= 1:
            raise ValueError(f"drift_stale_weight must be in [0, 1], got {self.drift_stale_weight}")
        for name in ("rating_class_balance", "feedback_kind_balance"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        self.shaping_terms  # noqa: B018 - raises ValueError naming a bad shaping entry
        self.retention_policy  # noqa: B018 - raises ValueError naming a bad registry_keep_* knob

    @property
    def shaping_terms(self) -> tuple[ShapingTerm, ...]:
        """The declared reward-shaping terms (ValueError naming a bad entry)."""
        return parse_shaping(self.shaping)

    @property
    def retention_policy(self) -> RetentionPolicy:
        """The registry retention the trainer applies after each publish."""
        try:
            return RetentionPolicy(
                keep_last=self.registry_keep_last,
                keep_best=self.registry_keep_best,
                keep_rollback=max(self.registry_keep_rollback, self.gate_best_of_recent),
            )
        except ValueError as exc:
            raise ValueError(f"registry_{exc}") from None

    @property
    def store_location(self) -> str:
        return self.store or str(self.data_dir / "replay.sqlite3")

    @property
    def registry_location(self) -> str:
        return self.registry or str(self.data_dir / "registry")

    @property
    def work_path(self) -> Path:
        return self.work_dir or self.data_dir / "trainer"
