"""Ray for the distributed schemes, by what it does. Besides the actor modules of the schemes,
the only package that imports Ray.

    startup.py    Ray's lifetime: start a local Ray or join a cluster, leave it
    cluster.py    nodes, placing actors (the decisions are `distributed.placement`'s),
                  waiting until they are placed, releasing them
    calls.py      calls and failures: Ray's errors as ours, pending calls, a scheme's calls to
                  its replicas with each death counted once (`ReplicaCalls`)
    snapshots.py  the snapshot keeper's actor and the shards' background sender
    session.py    DriverSession: what a trainer holds on Ray, released whatever happens
"""
