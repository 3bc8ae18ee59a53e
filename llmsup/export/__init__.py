"""The manifest as another system's configuration: `kubernetes` turns a manifest and
its plan into Kubernetes objects (pure), `write` puts them in a directory.

    kubernetes.py   export(): selection, the plans, what is refused, the files
    refusals.py     what Kubernetes cannot express, and how each manifest field maps
    workloads.py    one server: Deployment or LeaderWorkerSet, its Service
    gateway.py      the gateway: its manifest (remote models), Deployment, Service
    secrets.py      the one Secret the user creates, and the command that creates it
    images.py       default images, and the vLLM flag table an image implies
    names.py        Kubernetes names and quantities
    write.py        the files on disk (the only effects)
"""
