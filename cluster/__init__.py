"""What every process of the cluster shares: config, Llama 4 math, checkpoint reading, placement, transport."""
