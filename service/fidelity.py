"""Risk-controlled thresholds for the admin API: ``{"max_disagreement": ε,
"confidence": 1 − δ}`` and ``{"max_accuracy_drop": ε, "confidence": 1 − δ}``.

Kept apart from the admin routes so that their validation can change independently;
the statistics are ``models.certify_thresholds`` on the checkpoint's calibration
(validation) data.
"""

from __future__ import annotations

from models import NotCertifiable, certify_thresholds
from service.errors import Conflict, NoCalibration, ValidationFailed
from service.repository import ServedModel
from service.schemas import Certificate, ThresholdUpdate

DEFAULT_CONFIDENCE = 0.95


class NotCertified(Conflict):
    """No threshold setting can be certified for the asked risk budget."""

    code = "not_certifiable"


class NoPredictions(Conflict):
    """The calibration data lack the per-exit predictions the disagreement risk needs."""

    code = "no_predictions"


def wants_certificate(body: ThresholdUpdate) -> bool:
    return body.max_disagreement is not None or body.max_accuracy_drop is not None


def certify_for(model: ServedModel, body: ThresholdUpdate) -> tuple[tuple[float, ...], Certificate]:
    """The cheapest thresholds certified for the body's risk budget (blocking: CPU work).

    Raises:
        NoCalibration: the checkpoint has no calibration data (409).
        NoPredictions: disagreement asked of data without predictions (409).
        NotCertified: nothing can be certified, e.g. too few samples for ε (409).
    """
    ckpt = model.checkpoint
    risk = "disagreement" if body.max_disagreement is not None else "accuracy_drop"
    eps = body.max_disagreement if body.max_disagreement is not None else body.max_accuracy_drop
    assert eps is not None
    confidence = DEFAULT_CONFIDENCE if body.confidence is None else body.confidence
    data = ckpt.calibration
    if data is None:
        raise NoCalibration(
            f"model {model.name!r} has no calibration data in its checkpoint; "
            "set explicit thresholds instead"
        )
    if risk == "disagreement" and data.prediction is None:
        raise NoPredictions(
            f"model {model.name!r}: its calibration data hold no per-exit predictions, which "
            "the disagreement risk needs (re-collect them with `python -m training.calibrate "
            "--recollect`); max_accuracy_drop works with these data"
        )
    try:
        cert = certify_thresholds(
            data, ckpt.model.exit_macs(), risk=risk, epsilon=eps, delta=1.0 - confidence
        )
    except NotCertifiable as exc:
        raise NotCertified(f"model {model.name!r}: {exc}") from None
    except ValueError as exc:
        raise ValidationFailed(str(exc)) from None
    return cert.point.thresholds, Certificate(
        risk=cert.risk,
        epsilon=cert.epsilon,
        confidence=1.0 - cert.delta,
        certified_bound=cert.bound,
        empirical_risk=cert.empirical_risk,
        p_value=cert.p_value,
        tested_samples=cert.tested_samples,
        path_samples=cert.path_samples,
    )
