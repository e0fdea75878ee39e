package viewkeeper.testbed;

import java.io.IOException;
import java.io.InputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.Collection;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.apache.logging.log4j.Level;
import org.apache.logging.log4j.core.appender.ConsoleAppender;
import org.apache.logging.log4j.core.config.Configurator;
import org.apache.logging.log4j.core.config.builder.api.AppenderComponentBuilder;
import org.apache.logging.log4j.core.config.builder.api.ConfigurationBuilder;
import org.apache.logging.log4j.core.config.builder.api.ConfigurationBuilderFactory;
import org.apache.logging.log4j.core.config.builder.impl.BuiltConfiguration;
import org.opensearch.analysis.common.CommonAnalysisPlugin;
import org.opensearch.cluster.service.ClusterService;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.index.mapper.MapperExtrasPlugin;
import org.opensearch.index.reindex.ReindexPlugin;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.painless.PainlessPlugin;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;

/**
 * A single-node OpenSearch 2.19 cluster in one JVM, for the viewkeeper test bed only.
 *
 * <p>Usage: {@code java -cp CLASSPATH viewkeeper.testbed.EmbeddedNode HTTP_PORT HOME_DIR
 * [--watch-stdin]}. HOME_DIR is used as path.home; data and logs go below it. With
 * --watch-stdin the JVM exits when its standard input reaches end-of-file, so a launcher that
 * dies (even by SIGKILL) cannot leave an orphan JVM behind: the launcher holds the pipe.
 *
 * <p>The OpenSearch bootstrap (root check, JarHell, bootstrap checks, security manager) is not
 * run: only {@link Node} is used, with the needed modules passed as classpath plugins.
 */
public final class EmbeddedNode {

    private static final List<Class<? extends Plugin>> PLUGINS =
            List.of(
                    Netty4Plugin.class,
                    PainlessPlugin.class,
                    CommonAnalysisPlugin.class,
                    ReindexPlugin.class,
                    MapperExtrasPlugin.class);

    /** Node's plugin-taking constructor is protected; this subclass makes it reachable. */
    static final class TestbedNode extends Node {
        TestbedNode(Environment environment, Collection<Class<? extends Plugin>> plugins) {
            super(environment, plugins, true);
        }

        @Override
        protected void configureNodeAndClusterIdStateListener(ClusterService clusterService) {
            // That listener only feeds a log4j pattern converter we do not use.
        }
    }

    private EmbeddedNode() {}

    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: EmbeddedNode HTTP_PORT HOME_DIR [--watch-stdin]");
            System.exit(2);
        }
        int httpPort = Integer.parseInt(args[0]);
        Path home = Path.of(args[1]).toAbsolutePath();
        boolean watchStdin = args.length > 2 && "--watch-stdin".equals(args[2]);

        configureLogging();
        Files.createDirectories(home.resolve("config"));
        Files.createDirectories(home.resolve("data"));
        Files.createDirectories(home.resolve("logs"));

        Settings settings =
                Settings.builder()
                        .put("cluster.name", "viewkeeper-testbed")
                        .put("node.name", "testbed")
                        .put("path.home", home.toString())
                        .put("path.data", home.resolve("data").toString())
                        .put("path.logs", home.resolve("logs").toString())
                        .put("discovery.type", "single-node")
                        .put("network.host", "127.0.0.1")
                        .put("http.type", "netty4")
                        .put("transport.type", "netty4")
                        .put("http.port", httpPort)
                        // 0 = an ephemeral port: nothing connects to transport in single-node mode.
                        .put("transport.port", "0")
                        .put("cluster.routing.allocation.disk.threshold_enabled", false)
                        // Small heap: the real-memory breaker would turn GC lag into 429s.
                        .put("indices.breaker.total.use_real_memory", false)
                        // Tests compile many distinct scripts quickly.
                        .put("script.disable_max_compilations_rate", true)
                        .put("node.max_local_storage_nodes", 1)
                        .build();

        Environment environment =
                InternalSettingsPreparer.prepareEnvironment(
                        settings, java.util.Map.of(), home.resolve("config"), () -> "testbed");
        Node node = new TestbedNode(environment, PLUGINS);

        CountDownLatch closed = new CountDownLatch(1);
        Thread shutdown =
                new Thread(
                        () -> {
                            closeQuietly(node);
                            closed.countDown();
                        },
                        "testbed-shutdown");
        Runtime.getRuntime().addShutdownHook(shutdown);

        node.start();
        System.out.println("EmbeddedNode started: http://127.0.0.1:" + httpPort);
        System.out.flush();

        if (watchStdin) {
            Thread watcher =
                    new Thread(
                            () -> {
                                drain(System.in);
                                System.err.println("EmbeddedNode: stdin closed, shutting down");
                                System.exit(0);
                            },
                            "testbed-stdin-watch");
            watcher.setDaemon(true);
            watcher.start();
        }
        // Node threads are non-daemon; keep main parked until the shutdown hook has run.
        closed.await();
    }

    private static void drain(InputStream in) {
        byte[] buffer = new byte[256];
        try {
            while (in.read(buffer) >= 0) {
                // discard
            }
        } catch (IOException e) {
            // treat as EOF
        }
    }

    private static void closeQuietly(Node node) {
        try {
            node.close();
            node.awaitClose(20, TimeUnit.SECONDS);
        } catch (Exception e) {
            System.err.println("EmbeddedNode: error while closing: " + e);
        }
    }

    /**
     * Console logging at WARN (override with -Dtestbed.log.level=INFO), unless the caller gave a
     * log4j2 configuration file with -Dlog4j2.configurationFile.
     */
    private static void configureLogging() {
        if (System.getProperty("log4j2.configurationFile") != null
                || System.getProperty("log4j.configurationFile") != null) {
            return;
        }
        Level level = Level.toLevel(System.getProperty("testbed.log.level", "WARN"), Level.WARN);
        ConfigurationBuilder<BuiltConfiguration> builder =
                ConfigurationBuilderFactory.newConfigurationBuilder();
        builder.setStatusLevel(Level.ERROR);
        builder.setConfigurationName("testbed");
        AppenderComponentBuilder console =
                builder.newAppender("console", "Console")
                        .addAttribute("target", ConsoleAppender.Target.SYSTEM_ERR)
                        .add(
                                builder.newLayout("PatternLayout")
                                        .addAttribute(
                                                "pattern",
                                                "[%d{HH:mm:ss,SSS}][%-5p][%c{1.}] %m%n"));
        builder.add(console);
        builder.add(builder.newRootLogger(level).add(builder.newAppenderRef("console")));
        // Expected in tests: a scripted upsert that sets ctx.op = "noop" logs a WARN per doc.
        builder.add(builder.newLogger("org.opensearch.action.update.UpdateHelper", Level.ERROR));
        // Printed at every start: dangling-index import is off by default.
        builder.add(builder.newLogger("org.opensearch.gateway.DanglingIndicesState", Level.ERROR));
        Configurator.reconfigure(builder.build());
    }
}
