"""Local mode: run FineTuneJobs and CompressJobs on this machine with the same plan and runtimes
as the cluster, processes standing in for pods."""
