"""The site's ClientApp runtime: Flower's own `flwr-clientapp`, with the
site's approval check (`fedgan.site.approval`) before the app bundle is installed.

Flower's runtime (``flwr.supernode.runtime.run_clientapp``) pulls the task's
message, context, run and FAB from the SuperNode, then installs the FAB and
imports the ClientApp it names. We wrap exactly those two steps and reuse
everything else: the pulled context gives the site's work dir and id, and the
check runs where Flower would install. A refused FAB raises `AppRefused`
inside Flower's task, so Flower's own error handling replies to the ServerApp
with the reason; nothing from the FAB was written or imported.

The SuperNode launches its ClientApp runtime by the name ``flwr-clientapp``
on its PATH; the launcher (local and container) puts ours first
(`fedgan.deploy.commands.clientapp_shim`). If a Flower upgrade moves either
step, this refuses to start rather than run unchecked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

# Set once the bundle of this process's task was admitted; the ClientApp
# refuses to train in a process where it is not (a SuperNode started without
# this runtime).
admitted_fab: str | None = None


def _hook(runtime: Any) -> None:
    from fedgan.site import approval  # here: the shim itself stays light

    missing = [n for n in ("pull_task_input", "install_from_fab") if not hasattr(runtime, n)]
    if missing:
        raise SystemExit(
            f"fedgan-clientapp: flwr's ClientApp runtime has no {', '.join(missing)}; this "
            "Flower version is not supported, so no app bundle can be checked: nothing runs"
        )
    pull, install = runtime.pull_task_input, runtime.install_from_fab
    pulled: dict[str, Any] = {}

    def pull_task_input(client: Any) -> Any:
        message, context, run, fab = pull(client)
        pulled.update(context=context, run=run)
        return message, context, run, fab

    def install_from_fab(fab_content: bytes, *args: Any, **kwargs: Any) -> Any:
        global admitted_fab
        context, run = pulled["context"], pulled["run"]
        node_config = dict(context.node_config)
        site_id = str(node_config.get("site-id", "?"))
        store = approval.PolicyStore(Path(str(node_config["work-dir"])), site_id)
        try:
            admitted_fab = approval.admit_fab(
                store.load(), fab_content, site_id, approval.installed_version()
            )
        except approval.AppRefused as refusal:
            raise store.refuse(
                refusal, run=str(run.run_id), fab_sha256=approval.fab_sha256(fab_content)
            ) from None
        return install(fab_content, *args, **kwargs)

    runtime.pull_task_input = pull_task_input
    runtime.install_from_fab = install_from_fab


def run_in_process() -> None:
    """Flower's ClientApp runtime with the check, in this process."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp

    _hook(run_clientapp)
    sys.argv[0] = "flwr-clientapp"
    flwr_clientapp()


def main() -> None:
    """`flwr-clientapp` as the SuperNode starts it: through the site's warm
    runtime when one serves (`fedgan.site.warm_runtime`), else in this
    process. `fedgan-clientapp --serve SOCKET` is that server."""
    from fedgan.site import warm_runtime

    if sys.argv[1:2] == ["--serve"] and len(sys.argv) == 3:
        warm_runtime.serve(Path(sys.argv[2]))
        return
    server = os.environ.get(warm_runtime.ENV)
    if server:
        status = warm_runtime.run_through(server)
        if status is not None:
            warm_runtime.exit_as(status)
    run_in_process()
