"""Teacher scouting: which teachers are worth a transfer, from one forward pass of each model.

Before any training, four cheap statistics of a (student, teacher) pair on held-out labelled data
predict the Δ a transfer would give:

- ``positive_flips``  ρ_pos, percent of samples the student gets wrong and the teacher right;
- ``teacher_share``   percent of samples KL+DP would route to the teacher (the method's own rule);
- ``accuracy_gap``    teacher accuracy minus student accuracy, in points;
- ``flip_spread``     how evenly the positive flips spread over classes: their entropy over ln C
                      (1: spread evenly, 0: all in one class).

A fifth statistic, ``ensemble_delta`` (the ensemble of student and teacher over the student, in
points: the pair's ceiling), is shown beside them and can be chosen as a feature when fitting
(``fit_study(..., features=...)``); the shipped predictor keeps the four above, and a predictor
always predicts from the feature list stored in its file.

A :class:`ScoutPredictor` (standardised features, ridge regression) maps them to a predicted Δ
with an interval from leave-one-out residuals. It is fitted on a study's realised Δs
(:func:`fit_study`), and :func:`leave_one_student_out` says how well it ranks pairs of a model it
has not seen (leave-one-model-out, with the optimistic leave-one-student-out beside it). :func:`scout` ranks a student's candidate teachers with it.

The modules, each importing only those before it: ``features`` (the pair statistics), ``predictor``
(the ridge predictor, its file and the shipped one), ``fitting`` (held-out predictions and their
scores), ``study_fit`` (a study folder's pairs and realised Δs, :func:`fit_study`) and ``ranking``
(:func:`scout`). The rank statistics (``spearman`` and its interval) live in
:mod:`ktransfer.rank_statistics` and are re-exported here.

``ktransfer.scout`` as an attribute of the ``ktransfer`` package is the function :func:`scout`;
the names below are imported from the package: ``from ktransfer.scout import fit_study``, and its modules
so too: ``from ktransfer.scout import fitting`` (``import ktransfer.scout.fitting as m`` meets the function).
"""

from __future__ import annotations

from ..rank_statistics import ranks, spearman, spearman_with_interval
from .features import AVAILABLE_FEATURES, FEATURE_LABELS, FEATURES, PairStatistics, check_features, flip_spread, pair_statistics, routed_share
from .fitting import HELD_OUT_SPLITS, ScoutedPair, held_out_predictions, leave_one_student_out, noise_summary, score_predictions
from .predictor import DEFAULT_COVERAGE, DEFAULT_PREDICTOR, DEFAULT_RIDGE, PREDICTOR_FILE, ScoutPredictor, fit_predictor
from .ranking import VERDICTS, ScoutedTeacher, ScoutResult, scout, verdict
from .study_fit import PER_PAIR_KEYS, STUDY_SCOUT_FILE, StudyFit, check_score_on, fit_study, realised_deltas, study_pairs, study_records

__all__ = [
    "AVAILABLE_FEATURES", "FEATURES", "PairStatistics", "ScoutPredictor", "ScoutResult", "ScoutedPair", "ScoutedTeacher", "StudyFit", "fit_predictor", "fit_study",
    "flip_spread", "held_out_predictions", "leave_one_student_out", "pair_statistics", "routed_share", "scout", "spearman", "spearman_with_interval", "verdict",
]
