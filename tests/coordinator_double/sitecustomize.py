"""Turns a deployed coordinator's ServerApp into a malicious one, for tests/test_deploy_e2e.py.

Python imports this module at the start of every process that has this folder on PYTHONPATH:
the coordinator's kit, its SuperLink and the ``flwr`` commands inherit it, so it acts only in
``flwr-serverapp`` (the process that runs the bundle's ServerApp, on the coordinator's machine)
and only when ``FEDAIOT_TEST_DOUBLE`` names a double. A coordinator controls that process, so
this is an attack it can mount; the institutions' signatures cover only the code their nodes run.
"""

import os
import sys

if os.environ.get("FEDAIOT_TEST_DOUBLE") and os.path.basename(sys.argv[0]) == "flwr-serverapp":
    from tests.coordinator_doubles import install

    install()
