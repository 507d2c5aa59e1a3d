"""``check()`` for the facades: the one piece ``M3Model`` and ``M3Reranker`` share for it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .check import CheckReport


class SelfCheck:
    """Gives a facade holding an ``engine`` its ``check()`` and ``last_check``."""

    last_check: CheckReport | None = None  # what check() last returned (m3 serve --check: in /info)

    def check(self) -> CheckReport:
        """This model (its variant, on the provider it runs on) against the PyTorch outputs
        stored in its package at export, as ``m3 check`` does: one ``CheckResult`` row,
        PASS, FAIL or SKIP with the reason and the measures (``m3_runtime.check``)."""
        from .check import check_loaded  # check imports the facades' modules

        self.last_check = check_loaded(self)
        return self.last_check
