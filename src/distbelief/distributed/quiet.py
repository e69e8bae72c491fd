"""Run by Ray in every worker process of our jobs (`worker_process_setup_hook`, set by
`runtime.startup.start_ray`): kept free of heavy imports, since every Ray process pays for them.

Ray Train's placement-group cleaner asks Ray's state API, which only a full dashboard serves,
whether the run's controller still lives; without one it warns every few seconds for the whole
run (Ray 2.60). It has nothing else to say, and Ray removes the placement group with the run.
"""

import logging

CHATTY = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_worker() -> None:
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.ERROR)
