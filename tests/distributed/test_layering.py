"""The layering the package promises: Ray only in the runtime and the actor modules; the
schemes' cores (shards, replicas, queues) import without it."""

import pathlib
import subprocess
import sys

import distbelief

SRC = pathlib.Path(distbelief.__file__).parent


def test_only_the_runtime_and_the_actor_modules_import_ray():
    importing = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                       if any(line.strip().startswith(("import ray", "from ray"))
                              for line in p.read_text().splitlines()))
    assert importing == ["distributed/downpour/actors.py", "distributed/pipeline/actors.py",
                         "distributed/runtime.py", "distributed/sandblaster/actors.py",
                         "distributed/sync/actors.py"]


def test_the_cores_and_the_engine_import_without_ray():
    code = ("import sys\n"
            "import distbelief.cli, distbelief.engine, distbelief.distributed, distbelief.api\n"
            "import distbelief.distributed.downpour, distbelief.distributed.sandblaster\n"
            "import distbelief.distributed.placement, distbelief.distributed.server_model\n"
            "import distbelief.distributed.pipeline, distbelief.distributed.pipeline.replica\n"
            "import distbelief.distributed.sync.worker, distbelief.distributed.sync.hub\n"
            "import distbelief.distributed.downpour.rules, distbelief.distributed.wire\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
