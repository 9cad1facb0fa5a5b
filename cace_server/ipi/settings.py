"""Settings of the server's own i-PI connections (one frozen dataclass)."""

from __future__ import annotations

from dataclasses import dataclass

from cace_server.options import option


@dataclass(frozen=True)
class IpiSettings:
    """The i-PI runs the server drives from start-up (more may attach over HTTP)."""

    # Addresses (unix:NAME, shm:NAME or host:port), connections per address, and the
    # structure file giving the species of each address (one for all, or one each).
    addresses: tuple[str, ...] = option(
        (), name="ipi", help="i-PI address to drive: unix:NAME or HOST:PORT; repeatable"
    )
    clients: int = option(1, name="ipi_clients", help="connections per i-PI address (one per bead)")
    templates: tuple[str, ...] = option(
        (),
        name="ipi_template",
        help="structure file giving the species of the i-PI system (one, or one per --ipi)",
    )
    reconnect: bool = option(
        True,
        name="ipi_reconnect",
        help="reconnect when i-PI goes away; with --no-http and --no-ipi-reconnect the "
        "server exits once every i-PI run has ended",
    )
    # i-PI asks for close contacts on purpose (vibrational analyses, scans): computed
    # with a warning in the log unless this is on.
    refuse_close_contacts: bool = option(
        False,
        name="ipi_refuse_close_contacts",
        help="refuse i-PI structures with atoms closer than --min-distance (ends the run, "
        "see the README); off: compute them and log a warning",
    )
    model: str | None = option(
        None, name="ipi_model", show="default model", help="model for i-PI connections"
    )
    # Born effective charges for i-PI (its field-driven MD reads them from the extras):
    # computed when the model has them, unless this is off (they cost backward passes).
    bec: bool = option(
        True,
        name="ipi_bec",
        help="send i-PI Born effective charges (extra BEC) when the model has them",
    )

    def __post_init__(self) -> None:
        if self.addresses and not self.templates:
            raise ValueError(
                "--ipi needs --ipi-template FILE: i-PI does not send atomic species, so the "
                "server reads them from a structure file with the same atoms as i-PI's input"
            )
        if self.templates and len(self.templates) not in (1, len(self.addresses)):
            raise ValueError("give one --ipi-template for all --ipi addresses, or one for each")
        if self.clients < 1:
            raise ValueError("ipi_clients must be at least 1")

    def templates_per_address(self) -> list[tuple[str, str]]:
        """(address, template) for every address."""
        templates = self.templates
        if len(templates) == 1:
            templates = templates * len(self.addresses)
        return list(zip(self.addresses, templates, strict=True))
