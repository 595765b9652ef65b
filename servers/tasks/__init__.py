"""The tasks service: the only writer of task state (TasksService, TasksInternalService)."""
