#!/usr/bin/env bash
# Set up .venv-app (the web app's own virtualenv) and run the app's browser tests in headless Chromium.
# Needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver); without them
# the tests skip and say so. Screenshots go to build/app-screenshots/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-app.sh "app,app-test"
export COTEXNET_APP_SCREENSHOTS="${COTEXNET_APP_SCREENSHOTS:-$PWD/build/app-screenshots}"
exec .venv-app/bin/python -m pytest -q -s Testing/test_app_browser.py Testing/test_app_gateway.py Testing/test_app_files.py "$@"
