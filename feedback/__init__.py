"""feedback: the search log, click events, pair mining, fine-tuning, the evaluation gate and promotion."""

from feedback.demo import DEMO_ARCH, DEMO_TRAIN, DEMO_VERSION, ensure_demo_model, evaluate_demo, summarise
from feedback.evaluate import EvalReport, EvalSet, RetrievalScores, TextQuery, evaluate, rank_metrics
from feedback.events import record_search
from feedback.train import PairData, TrainConfig, TrainingError, TrainProgress, TrainResult, train_contrastive
from feedback.versions import ModelVersionExistsError, read_model_json, training_workdir, write_model_version

__all__ = [
    "DEMO_ARCH",
    "DEMO_TRAIN",
    "DEMO_VERSION",
    "EvalReport",
    "EvalSet",
    "ModelVersionExistsError",
    "PairData",
    "RetrievalScores",
    "TextQuery",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "TrainingError",
    "ensure_demo_model",
    "evaluate",
    "evaluate_demo",
    "rank_metrics",
    "read_model_json",
    "record_search",
    "summarise",
    "train_contrastive",
    "training_workdir",
    "write_model_version",
]
