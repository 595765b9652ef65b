from servers.agents.models import Base
from servers.common import migrations

migrations.run(Base.metadata)
