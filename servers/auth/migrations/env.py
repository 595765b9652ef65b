from servers.auth.models import Base
from servers.common import migrations

migrations.run(Base.metadata)
