"""The auth service: accounts, tokens, API keys and user administration (AuthService,
UsersService, AuthInternalService)."""
