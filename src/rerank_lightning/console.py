"""Console logging for train.py (wired in conf/hydra/default.yaml): each message once, no adverts."""

import logging


class NoAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing ..." lines, which advertise a hosted service."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")
