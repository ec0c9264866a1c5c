// Test-only launcher: runs mongo-java-server (an in-memory server that speaks the MongoDB
// wire protocol) on 127.0.0.1 and the port given, until it is killed.
import de.bwaldvogel.mongo.MongoServer;
import de.bwaldvogel.mongo.MongoVersion;
import de.bwaldvogel.mongo.backend.memory.MemoryBackend;
import java.util.List;

public final class MongoWireServer {
  // The Node.js driver refuses servers below wire version 9 (MongoDB 4.4). The commands keygate
  // sends are all served by this backend, so it announces 4.4 in the handshake.
  private static final MongoVersion ANNOUNCED = new MongoVersion() {
    @Override
    public List<Integer> getVersionArray() {
      return List.of(4, 4, 0);
    }

    @Override
    public int getWireVersion() {
      return 9;
    }
  };

  public static void main(String[] args) throws InterruptedException {
    int port = Integer.parseInt(args[0]);
    MongoServer server = new MongoServer(new MemoryBackend().version(ANNOUNCED));
    server.bind("127.0.0.1", port);
    Runtime.getRuntime().addShutdownHook(new Thread(server::shutdownNow));
    System.out.println("mongo-wire listening on 127.0.0.1:" + port);
    Thread.currentThread().join();
  }
}
