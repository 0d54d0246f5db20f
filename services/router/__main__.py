"""`python -m services.router`: run a router with settings from LOOPLINE_ROUTER_* variables."""

from services.router.main import main

main()
