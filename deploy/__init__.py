"""How the cluster is brought up: the CLI and launcher, configs, Ray job entrypoint, KubeRay manifests."""
