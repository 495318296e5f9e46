"""Start the server from a checkout: ``python run.py --help``."""

from asgilook_aiohttp.__main__ import main

if __name__ == "__main__":
    main()
