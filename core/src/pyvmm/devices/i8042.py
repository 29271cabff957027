"""The i8042 keyboard controller at 0x60/0x64, as far as a VMM without a keyboard
needs it: status reads, the controller command byte, self-tests, and the two
ways guests reset the machine through it (command 0xFE, and clearing the reset
line through the output port, command 0xD1).
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.devices.base import Device
from pyvmm.devices.state import DeviceState, DeviceStateError, Stateful, check_fields, take

DATA_PORT = 0x60
COMMAND_PORT = 0x64

STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM = 0x04
STATUS_COMMAND = 0x08  # the last write went to the command port
STATUS_UNLOCKED = 0x10

CMD_READ_COMMAND_BYTE = 0x20
CMD_WRITE_COMMAND_BYTE = 0x60
CMD_SELF_TEST = 0xAA
CMD_INTERFACE_TEST = 0xAB
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_PULSE_RESET = 0xFE

SELF_TEST_OK = 0x55
#: Output port: bit 0 is the CPU reset line (active low), bit 1 the A20 gate.
OUTPUT_PORT_DEFAULT = 0x03


class I8042(Device):
    """Registered on two one-port ranges: offset 0 is whichever port was hit, so
    the machine registers it twice through :class:`I8042Port` views."""

    name = "i8042"
    state_version = 1

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self.command_byte = 0x00
        self.output_port = OUTPUT_PORT_DEFAULT
        self._status = STATUS_SYSTEM | STATUS_UNLOCKED
        self._output: int | None = None
        self._pending_command: int | None = None

    def data_port(self) -> I8042Port:
        return I8042Port(self, DATA_PORT)

    def command_port(self) -> I8042Port:
        return I8042Port(self, COMMAND_PORT)

    def read_port(self, port: int) -> int:
        if port == COMMAND_PORT:
            status = self._status
            if self._output is not None:
                status |= STATUS_OUTPUT_FULL
            return status
        value, self._output = self._output, None
        return 0 if value is None else value

    def write_port(self, port: int, value: int) -> None:
        value &= 0xFF
        if port == COMMAND_PORT:
            self._status |= STATUS_COMMAND
            self._command(value)
            return
        self._status &= ~STATUS_COMMAND
        pending, self._pending_command = self._pending_command, None
        if pending == CMD_WRITE_COMMAND_BYTE:
            self.command_byte = value
        elif pending == CMD_WRITE_OUTPUT_PORT:
            self.output_port = value
            if not value & 0x01:
                self._on_reset()
        # Data for the keyboard itself goes nowhere: there is no keyboard.

    def _command(self, command: int) -> None:
        if command == CMD_PULSE_RESET:
            self._on_reset()
        elif command == CMD_READ_COMMAND_BYTE:
            self._output = self.command_byte
        elif command in (CMD_WRITE_COMMAND_BYTE, CMD_WRITE_OUTPUT_PORT):
            self._pending_command = command
        elif command == CMD_SELF_TEST:
            self._output = SELF_TEST_OK
        elif command == CMD_INTERFACE_TEST:
            self._output = 0x00
        elif command == CMD_READ_OUTPUT_PORT:
            self._output = self.output_port

    def save_state(self) -> DeviceState:
        # -1: nothing waiting (a byte is 0..255).
        return {
            "command_byte": self.command_byte,
            "output_port": self.output_port,
            "status": self._status,
            "output": -1 if self._output is None else self._output,
            "pending_command": -1 if self._pending_command is None else self._pending_command,
        }

    def load_state(self, state: DeviceState) -> None:
        check_fields(self.name, state, {"command_byte", "output_port", "status", "output", "pending_command"})
        command_byte = take(self.name, state, "command_byte", int, 8)
        output_port = take(self.name, state, "output_port", int, 8)
        status = take(self.name, state, "status", int, 8)
        output, pending = _byte_or_none(state, "output"), _byte_or_none(state, "pending_command")
        if pending not in (-1, CMD_WRITE_COMMAND_BYTE, CMD_WRITE_OUTPUT_PORT):
            raise DeviceStateError(f"device {self.name}: {pending:#x} is not a command that waits for data")
        self.command_byte, self.output_port, self._status = command_byte, output_port, status
        self._output = None if output == -1 else output
        self._pending_command = None if pending == -1 else pending


def _byte_or_none(state: DeviceState, field: str) -> int:
    """A saved byte register that may be empty: 0..255, or -1 for nothing."""
    value = state.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not -1 <= value <= 0xFF:
        raise DeviceStateError(f"device {I8042.name}: field {field} must be a byte or -1, not {value!r}")
    return value


class I8042Port(Device):
    """One of the controller's two ports, as a bus sees it."""

    name = "i8042"

    def __init__(self, controller: I8042, port: int) -> None:
        self._controller = controller
        self._port = port

    def read(self, offset: int, size: int) -> int:
        return self._controller.read_port(self._port)

    def write(self, offset: int, size: int, value: int) -> None:
        self._controller.write_port(self._port, value)

    def state_holder(self) -> Stateful:
        return self._controller
