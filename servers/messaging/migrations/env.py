from servers.common import migrations
from servers.messaging.models import Base

migrations.run(Base.metadata)
