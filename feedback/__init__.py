"""feedback: the search log, click events, pair mining, fine-tuning, the evaluation gate and promotion."""

from feedback.demo import DEMO_ARCH, DEMO_TRAIN, DEMO_VERSION, ensure_demo_model, evaluate_demo, summarise
from feedback.evaluate import EvalReport, EvalSet, RetrievalScores, TextQuery, evaluate, rank_metrics
from feedback.events import EventBatchError, EventConflictError, EventsOutcome, record_events, record_search, search_log_row
from feedback.search_log import SearchLogWriter
from feedback.train import PairData, TrainConfig, TrainingError, TrainProgress, TrainResult, train_contrastive
from feedback.pairs import ClickPair, MinedPairs, MiningConfig, mine_pairs, normalise_query, split_by_time
from feedback.retrain import (
    FINETUNE_TRAIN,
    ClickQuery,
    GateConfig,
    RetrainConfig,
    RetrainError,
    RetrainOutcome,
    click_queries,
    gate_candidate,
    prune_logs,
    run_queued_retrain,
    run_retrain,
)
from feedback.schedule import RetrainBusyError, is_running, job_lock, next_run, run_nightly, this_process
from feedback.versions import (
    ModelVersionExistsError,
    activate_version,
    read_model_json,
    training_workdir,
    write_model_version,
)
from feedback.worker import RetrainWorker, WorkerStopped, nightly_key

__all__ = [
    "ClickPair",
    "ClickQuery",
    "DEMO_ARCH",
    "DEMO_TRAIN",
    "DEMO_VERSION",
    "EvalReport",
    "EvalSet",
    "EventBatchError",
    "EventConflictError",
    "EventsOutcome",
    "FINETUNE_TRAIN",
    "GateConfig",
    "MinedPairs",
    "MiningConfig",
    "ModelVersionExistsError",
    "PairData",
    "RetrainBusyError",
    "RetrainConfig",
    "RetrainError",
    "RetrainOutcome",
    "RetrainWorker",
    "RetrievalScores",
    "SearchLogWriter",
    "TextQuery",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "TrainingError",
    "WorkerStopped",
    "activate_version",
    "ensure_demo_model",
    "click_queries",
    "evaluate",
    "evaluate_demo",
    "is_running",
    "gate_candidate",
    "job_lock",
    "mine_pairs",
    "next_run",
    "nightly_key",
    "normalise_query",
    "prune_logs",
    "rank_metrics",
    "read_model_json",
    "record_events",
    "record_search",
    "run_nightly",
    "search_log_row",
    "run_queued_retrain",
    "run_retrain",
    "split_by_time",
    "summarise",
    "this_process",
    "train_contrastive",
    "training_workdir",
    "write_model_version",
]
