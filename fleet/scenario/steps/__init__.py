"""Every kind of scenario step, one class each, registered in :data:`STEPS` by its name.

A new step kind is one class in one of these modules (or a new module imported here): its
``kind``, its ``fields``, ``read`` (checked, errors naming file, line and field) and ``run``.
"""

from fleet.scenario.steps.authority import RetireCaStep, RevokeIssuingCaStep, RotateCaStep
from fleet.scenario.steps.base import STEPS, Step, StepReader, step_kinds
from fleet.scenario.steps.broker import (
    BrokerCertificateStep,
    PolicyStep,
    RestartBrokerStep,
    StartBrokerStep,
    StopBrokerStep,
)
from fleet.scenario.steps.certificates import ReplaceStep, RevokeStep, RotateStep
from fleet.scenario.steps.checks import ENROLLMENT_OUTCOMES, ExpectStep, WaitStep
from fleet.scenario.steps.claims import CreateClaimStep, EnrollStep, RevokeClaimStep
from fleet.scenario.steps.devices import (
    ConnectStep,
    DisconnectStep,
    ProvisionStep,
    PublishStep,
    SubscribeStep,
)
from fleet.scenario.steps.revocation import (
    PublishCrlStep,
    StaleCrlStep,
    StartControlPlaneStep,
    StopControlPlaneStep,
)

__all__ = [
    "ENROLLMENT_OUTCOMES",
    "STEPS",
    "BrokerCertificateStep",
    "ConnectStep",
    "CreateClaimStep",
    "DisconnectStep",
    "EnrollStep",
    "ExpectStep",
    "PolicyStep",
    "ProvisionStep",
    "PublishCrlStep",
    "PublishStep",
    "ReplaceStep",
    "RestartBrokerStep",
    "RetireCaStep",
    "RevokeClaimStep",
    "RevokeIssuingCaStep",
    "RevokeStep",
    "RotateCaStep",
    "RotateStep",
    "StaleCrlStep",
    "StartBrokerStep",
    "StartControlPlaneStep",
    "Step",
    "StepReader",
    "StopBrokerStep",
    "StopControlPlaneStep",
    "SubscribeStep",
    "WaitStep",
    "step_kinds",
]
