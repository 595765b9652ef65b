from servers.common import migrations
from servers.tasks.models import Base

migrations.run(Base.metadata)
