"""The light session state machine matches the transitions.Machine amqtt builds per session."""

from __future__ import annotations

import pytest
from amqtt.session import Session
from transitions import MachineError

from broker.core import SessionStates


def test_same_states_transitions_callbacks_and_errors() -> None:
    session = Session()
    states = SessionStates(session)
    assert states.state == "new" and states.is_new()
    states.connect()
    assert states.is_connected() and session.last_connect_time is not None
    with pytest.raises(MachineError, match="connect from state connected"):
        states.connect()  # amqtt reads this as a take-over
    states.disconnect()
    assert states.is_disconnected() and session.last_disconnect_time is not None
    states.disconnect()  # disconnected -> disconnected is allowed, as in amqtt
    states.connect()
    assert states.is_connected() and session.last_disconnect_time is None
    fresh = SessionStates(Session())
    fresh.disconnect()  # new -> disconnected is allowed (offline sessions)
    assert fresh.is_disconnected()
